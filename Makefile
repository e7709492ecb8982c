# Two commands from a fresh clone: `make demo` and `make test`. Each builds .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements-extra.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test install clean-venv browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first: 2.13.0 is a local CPU build on the project machines; elsewhere the newest torch
# your platform has. The project's bound (<2.14) then keeps pip from swapping it out.
$(STAMP): $(PY) pyproject.toml requirements-extra.txt
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q "torch>=2.4,<2.14"
	$(PIP) install -q -e ".[test,ray]"
	$(PIP) install -q --no-deps -r requirements-extra.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/steerstrength run --preset demo

# Then the float-sensitive tests again as another CPU computes them: no vectorised kernels past SSE (ATEN), MKL's
# SSE4.2 code path, one thread. A test that assumes the same bits across batch shapes, threads or CPUs fails here
# on any machine, not only on a newcomer's (docs/reliability.md).
OTHER_CPU := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=1
FLOAT_TESTS := tests/test_reduce.py tests/test_steering.py tests/test_sweeps.py tests/test_stages.py

test: install browser
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(OTHER_CPU) $(PY) -m pytest -q -p no:cacheprovider -m "not slow" $(FLOAT_TESTS)

# The report's browser test needs headless Chromium (Debian package); installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (command -v apt-get >/dev/null 2>&1 && ( (id -u | grep -qx 0 && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) || \
	   (command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ) ) || \
	  echo "note: chromium not installed; the browser test will be skipped"

clean-venv:
	rm -rf $(VENV)
