"""The Python API mirrors the CLI: ``autotl.fit`` does what ``autotl fit`` does.

    python examples/python_api.py path/to/images [runs/example]
"""

import sys

import autotl

data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cats_vs_dogs"
out = sys.argv[2] if len(sys.argv) > 2 else "runs/example"

# As `autotl fit DIR --time-budget 3m`: rank the packaged models, search how to transfer (each trial
# cross-validated), refit the winner on all labelled images, export. `search=False` = one linear probe.
result = autotl.fit(data, out, time_budget="3m")
best = result.search["best"]
print(f"selected: {best['description']}")
print(f"cross-validated accuracy {best['value']:.4f} ± {best['value_std']:.4f}; ONNX model at {result.model_path}")

# Prediction needs only onnxruntime, numpy and pillow.
preds = autotl.predict(result.model_path, [data], top_k=1)
for p in preds.predictions[:5]:
    print(p["path"], p["top"][0]["label"], f"{p['top'][0]['prob']:.3f}")
