"""Compare two run directories table by table: `python benchmarks/compare_runs.py RUN_A RUN_B` (Parquet exactly, column order aside; JSONL byte for byte; JSON key by key, seconds aside)."""
import json, sys
from pathlib import Path
import pandas as pd

a, b = Path(sys.argv[1]) / "tables", Path(sys.argv[2]) / "tables"
names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
for name in names:
    pa, pb = a / name, b / name
    if not pa.exists() or not pb.exists():
        print(f"{name}: only in {'before' if pa.exists() else 'after'}")
        continue
    if name.endswith(".parquet"):
        fa, fb = pd.read_parquet(pa), pd.read_parquet(pb)
        extra = set(fa.columns) ^ set(fb.columns)
        common = [c for c in fa.columns if c in fb.columns]
        try:
            pd.testing.assert_frame_equal(fa[common], fb[common], check_exact=True, check_categorical=False)
            print(f"{name}: {len(fa)} rows x {len(common)} columns identical" + (f"; columns only in one: {sorted(extra)}" if extra else "")
                  + ("" if list(fa.columns) == list(fb.columns) else " (column order differs)"))
        except AssertionError as e:
            print(f"{name}: DIFFERS: {str(e)[:300]}")
    elif name.endswith(".jsonl"):
        print(f"{name}: {'identical' if pa.read_text() == pb.read_text() else 'DIFFERS'}")
    elif name.endswith(".json"):
        ja, jb = json.loads(pa.read_text()), json.loads(pb.read_text())
        def walk(x, y, path=""):
            out = []
            if isinstance(x, dict) and isinstance(y, dict):
                for k in sorted(set(x) | set(y)):
                    if k not in x or k not in y:
                        out.append(f"{path}/{k} only in {'before' if k in x else 'after'}")
                    else:
                        out += walk(x[k], y[k], f"{path}/{k}")
            elif x != y:
                out.append(f"{path}: {str(x)[:60]} -> {str(y)[:60]}")
            return out
        d = [x for x in walk(ja, jb) if "second" not in x]
        print(f"{name}: " + ("identical (seconds aside)" if not d else f"{len(d)} differences: " + "; ".join(d[:6])))
