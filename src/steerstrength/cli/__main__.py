"""`python -m steerstrength.cli`."""

from steerstrength.cli import main

main()
