"""Ideal code lengths of bf16 activations and gradients under value models richer than the
store's byte-plane codecs, to see whether any lossless coder could reach a given ratio.

Every model is fitted on the first half of the tokens and scored on the second half, so the
figures are what an arithmetic coder with those (cheaply transmitted) parameters would reach;
the cost of sending the parameters is left out, which favours the models. A value's code length
is -log2 of the model's probability of its bf16 rounding interval. Ratios are bits over 16.

    .venv-model/bin/python scripts/codec_bounds.py [../shared/data/gemma3-270m-l9-licenses]

Models, per array:
  column         Laplace per column (median, mean absolute deviation)
  column*row     the same with each token's own scale (its mean absolute deviation over the
                 columns, sent as side information at 16 bits a token, counted)
  predicted      Laplace around a linear prediction of each column from the token's earlier
                 columns (ridge, decoded column by column), a scale per column
  predicted*row  the prediction with the token's scale as above
Needs numpy only.
"""

import sys
from pathlib import Path

import numpy as np


def bf16_to_f64(u):
    return (u.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def half_ulp(u):
    exponent = ((u >> 7) & 0xFF).astype(np.int64)
    return 2.0 ** (np.maximum(exponent, 1) - 127 - 7) / 2


def laplace_cdf(x, mu, b):
    z = (x - mu) / b
    return np.where(z < 0, 0.5 * np.exp(np.minimum(z, 0)), 1 - 0.5 * np.exp(-np.maximum(z, 0)))


def bits(x, u, mu, b):
    h = half_ulp(u)
    p = laplace_cdf(x + h, mu, b) - laplace_cdf(x - h, mu, b)
    # A coder reserves a floor for every symbol; 2^-24 is far below any real probability here.
    return -np.log2(np.maximum(p, 2.0**-24)).sum()


def row_scaled(train_residual, test_residual, column_scale):
    """Per-value Laplace scales: a column scale times the token's own scale, which a coder
    would send before the token (16 bits each, counted by the caller)."""
    row_train = np.mean(np.abs(train_residual) / column_scale, 1, keepdims=True)
    column = np.mean(np.abs(train_residual) / row_train, 0)
    return column * np.mean(np.abs(test_residual) / column, 1, keepdims=True)


def ratios(u):
    x = bf16_to_f64(u)
    half = len(x) // 2
    train, test, u_test = x[:half], x[half:], u[half:]
    n, d = test.shape
    out = {}

    median = np.median(train, 0)
    scale = np.mean(np.abs(train - median), 0)
    out["column"] = bits(test, u_test, median, scale)

    scales = row_scaled(train - median, test - median, scale)
    out["column*row"] = bits(test, u_test, median, scales) + 16 * n

    mean = train.mean(0)
    centred, centred_test = train - mean, test - mean
    cov = centred.T @ centred / half
    fit, guess = np.empty_like(train), np.empty_like(test)
    fit[:, 0], guess[:, 0] = median[0], median[0]
    for c in range(1, d):
        a = cov[:c, :c]
        w = np.linalg.solve(a + 1e-3 * np.trace(a) / c * np.eye(c), cov[:c, c])
        fit[:, c] = mean[c] + centred[:, :c] @ w
        guess[:, c] = mean[c] + centred_test[:, :c] @ w
    residual_scale = np.mean(np.abs(train - fit), 0)
    out["predicted"] = bits(test, u_test, guess, residual_scale)
    scales = row_scaled(train - fit, test - guess, residual_scale)
    out["predicted*row"] = bits(test, u_test, guess, scales) + 16 * n
    return {k: v / (n * d * 16) for k, v in out.items()}


def main():
    data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/gemma3-270m-l9-licenses")
    results = {name: ratios(np.load(data / f"{name}.npy")) for name in ("acts", "grads")}
    print(f"{'model':<14} {'acts':>7} {'grads':>7} {'both':>7}")
    for model in results["acts"]:
        a, g = results["acts"][model], results["grads"][model]
        print(f"{model:<14} {a:7.4f} {g:7.4f} {(a + g) / 2:7.4f}")


if __name__ == "__main__":
    main()
