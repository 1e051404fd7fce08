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


def build_model():
    from onnx import TensorProto, checker, helper

    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 1], WEIGHTS)
    b = helper.make_tensor("b", TensorProto.FLOAT, [1], [BIAS])
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["logits_raw"], name="matmul"),
        helper.make_node("Add", ["logits_raw", "b"], ["logits"], name="add_bias"),
        helper.make_node("Sigmoid", ["logits"], ["risk"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "risk_logreg",
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
        outputs=[helper.make_tensor_value_info("risk", TensorProto.FLOAT, ["N", 1])],
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


def main(argv):
    if "--print-weights" in argv:
        print(json.dumps({"weights": WEIGHTS, "bias": BIAS, "features": FEATURE_NAMES}))
        return 0
    out = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "risk.onnx")
    model = build_model()
    with open(out, "wb") as f:
        f.write(model.SerializeToString())
    print(f"wrote {out} (opset {OPSET}, ir_version {IR_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
