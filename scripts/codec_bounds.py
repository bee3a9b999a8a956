"""Ideal code lengths of bf16 activations and gradients under value models richer than the
store's byte-plane codecs, to see whether any lossless coder could reach a given ratio.

Every model is fitted on the first half of the tokens and scored on the second half, so the
figures are what an arithmetic coder with those (cheaply transmitted) parameters would reach;
the cost of sending the parameters is left out, which favours the models. A value's code length
is -log2 of the model's probability of its bf16 rounding interval. Ratios are bits over 16.

    .venv-model/bin/python scripts/codec_bounds.py [--previous] [../shared/data/gemma3-270m-l9-licenses]

Models, per array:
  column         Laplace per column (median, mean absolute deviation)
  column*row     the same with each token's own scale (its mean absolute deviation over the
                 columns, sent as side information at 16 bits a token, counted)
  predicted      Laplace around a linear prediction of each column from the token's earlier
                 columns (ridge, decoded column by column), a scale per column
  predicted*row  the prediction with the token's scale as above
  predicted+prev (with --previous, a few minutes) the prediction from the token's earlier
                 columns and every column of the previous token (the sample is in context
                 order), ridge 0.1: the best of 1e-3, 1e-2, 0.1, 1 and 10 on acts
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


def ratios(u, previous=False):
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

    fit, guess = predict(x, d, half, lambda c: np.arange(c), 1e-3)
    fit[:, 0], guess[:, 0] = median[0], median[0]
    residual_scale = np.mean(np.abs(train - fit), 0)
    out["predicted"] = bits(test, u_test, guess, residual_scale)
    scales = row_scaled(train - fit, test - guess, residual_scale)
    out["predicted*row"] = bits(test, u_test, guess, scales) + 16 * n

    if previous:
        # Features: the token's earlier columns, then every column of the previous token.
        both = np.hstack([x, np.vstack([x[:1], x[:-1]])])
        fit, guess = predict(both, d, half, lambda c: np.r_[0:c, d : 2 * d], 1e-1)
        residual_scale = np.mean(np.abs(train - fit), 0)
        out["predicted+prev"] = bits(test, u_test, guess, residual_scale)
    return {k: v / (n * d * 16) for k, v in out.items()}


def predict(features, d, half, inputs, ridge):
    """Ridge predictions of each of the first `d` columns of `features` from the columns
    `inputs(c)`, fitted on the first `half` rows: (fit on those rows, guess on the rest)."""
    mean = features[:half].mean(0)
    centred = features - mean
    cov = centred[:half].T @ centred[:half] / half
    out = np.empty((len(features), d))
    for c in range(d):
        idx = inputs(c)
        if len(idx) == 0:
            out[:, c] = mean[c]
            continue
        a = cov[np.ix_(idx, idx)]
        w = np.linalg.solve(a + ridge * np.trace(a) / len(idx) * np.eye(len(idx)), cov[idx, c])
        out[:, c] = mean[c] + centred[:, idx] @ w
    return out[:half], out[half:]


def main():
    args = [a for a in sys.argv[1:] if a != "--previous"]
    previous = "--previous" in sys.argv[1:]
    data = Path(args[0] if args else "../shared/data/gemma3-270m-l9-licenses")
    results = {n: ratios(np.load(data / f"{n}.npy"), previous) for n in ("acts", "grads")}
    print(f"{'model':<14} {'acts':>7} {'grads':>7} {'both':>7}")
    for model in results["acts"]:
        a, g = results["acts"][model], results["grads"][model]
        print(f"{model:<14} {a:7.4f} {g:7.4f} {(a + g) / 2:7.4f}")


if __name__ == "__main__":
    main()
