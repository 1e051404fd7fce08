#!/usr/bin/env python3
"""Generate examples/models/risk.onnx: a tiny logistic-regression risk score.

    risk = sigmoid(features · W + b)

Input  ``features``: float32 [N, 4] (N is a dynamic batch dimension named "N")
Output ``risk``:     float32 [N, 1], each value in (0, 1)

The four features, in order (already normalised by the caller):
    0  debt_to_income       ratio, typically 0.0 .. 1.0
    1  late_payments        count in the last 12 months
    2  credit_utilization   ratio, 0.0 .. 1.0
    3  credit_history_years years / 10 (so 0.5 = five years)

The weights are fixed constants so the file is reproducible byte for byte and so
tests in any language can compute the expected numbers themselves. The model is
written with opset 13 and IR version 8, old enough for onnxruntime and for the
Rust `tract-onnx` crate to load.

Usage:  python3 gen_risk_model.py [OUTPUT]      (default: risk.onnx next to this script)
        python3 gen_risk_model.py --print-weights   (JSON, used by tests)
        python3 gen_risk_model.py --bias B OUTPUT   (same model with another bias: a "new
                                                     version" for tests of model replacement)
        python3 gen_risk_model.py --static-batch OUTPUT  (input [1, 4]: no dynamic batch dim)
        python3 gen_risk_model.py --fixtures OUTPUT.json  (inputs and onnxruntime's outputs
                                                     for risk.onnx, checked in for tests)
Requires: pip install onnx   (numpy comes with it)
"""

import json
import os
import sys

# Fixed model parameters. Tests import these (or read --print-weights).
WEIGHTS = [2.5, 0.8, 1.5, -0.6]
BIAS = -3.0
FEATURE_NAMES = [
    "debt_to_income",
    "late_payments",
    "credit_utilization",
    "credit_history_years",
]
OPSET = 13
IR_VERSION = 8


def build_model(bias=BIAS, batch="N"):
    from onnx import TensorProto, checker, helper

    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 1], WEIGHTS)
    b = helper.make_tensor("b", TensorProto.FLOAT, [1], [bias])
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["logits_raw"], name="matmul"),
        helper.make_node("Add", ["logits_raw", "b"], ["logits"], name="add_bias"),
        helper.make_node("Sigmoid", ["logits"], ["risk"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "risk_logreg",
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 4])],
        outputs=[helper.make_tensor_value_info("risk", TensorProto.FLOAT, [batch, 1])],
        initializer=[w, b],
        doc_string="risk = sigmoid(features . W + b); features: "
        + ", ".join(FEATURE_NAMES),
    )
    model = helper.make_model(
        graph,
        producer_name="outrider-examples",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    model.model_version = 1
    checker.check_model(model, full_check=True)
    return model


def reference(rows):
    """Pure-Python reference: the numbers the model must produce."""
    import math

    out = []
    for row in rows:
        z = sum(x * w for x, w in zip(row, WEIGHTS)) + BIAS
        out.append(1.0 / (1.0 + math.exp(-z)))
    return out


# Rows of the checked-in fixtures: typical, edge and batch values.
FIXTURE_ROWS = [
    [0.35, 2.0, 0.6, 0.4],
    [0.0, 0.0, 0.0, 0.0],
    [1.0, 12.0, 1.0, 3.0],
    [0.12, 0.0, 0.25, 1.5],
    [0.9, 5.0, 0.95, 0.1],
    [-0.5, 0.0, 0.1, 2.0],
    [0.5, 1.0, 0.5, 0.5],
    [0.25, 3.0, 0.8, 0.05],
]


def fixtures(path):
    """Inputs and onnxruntime's outputs for risk.onnx (and the pure-Python reference)."""
    import numpy as np
    import onnxruntime as ort

    here = os.path.dirname(os.path.abspath(__file__))
    session = ort.InferenceSession(os.path.join(here, "risk.onnx"), providers=["CPUExecutionProvider"])
    x = np.asarray(FIXTURE_ROWS, dtype=np.float32)
    (out,) = session.run(["risk"], {"features": x})
    data = {
        "rows": FIXTURE_ROWS,
        "onnxruntime": [float(v) for v in out.reshape(-1)],
        "reference": reference(FIXTURE_ROWS),
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")


def main(argv):
    if "--print-weights" in argv:
        print(json.dumps({"weights": WEIGHTS, "bias": BIAS, "features": FEATURE_NAMES}))
        return 0
    if "--fixtures" in argv:
        fixtures(argv[argv.index("--fixtures") + 1])
        return 0
    bias, batch = BIAS, "N"
    if "--bias" in argv:
        i = argv.index("--bias")
        bias = float(argv[i + 1])
        del argv[i : i + 2]
    if "--static-batch" in argv:
        argv.remove("--static-batch")
        batch = 1
    out = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "risk.onnx")
    model = build_model(bias, batch)
    with open(out, "wb") as f:
        f.write(model.SerializeToString())
    print(f"wrote {out} (opset {OPSET}, ir_version {IR_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
