"""Sample task: fit y ~ x1 + x2 + x3 by least squares on one shard, predict, write CSVs.

Standard library only, so it runs on a stock image. Reads
gs://$CFLOW_BUCKET/cflow/demo/SHARD and writes predictions.csv and
metrics.csv to $CFLOW_OUTPUT_DIR.
"""

import csv
import io
import math
import os
import sys


def read_shard(bucket, shard):
    from google.cloud import storage

    client = storage.Client()
    return client.bucket(bucket).blob(f"cflow/demo/{shard}").download_as_text()


def fit_least_squares(rows):
    """Coefficients [b0, b1, b2, b3] solving the normal equations by Gaussian elimination."""
    size = 4
    gram = [[0.0] * size for _ in range(size)]
    moment = [0.0] * size
    for features, target in rows:
        vector = [1.0, *features]
        for i in range(size):
            moment[i] += vector[i] * target
            for j in range(size):
                gram[i][j] += vector[i] * vector[j]
    for column in range(size):
        pivot = max(range(column, size), key=lambda r: abs(gram[r][column]))
        gram[column], gram[pivot] = gram[pivot], gram[column]
        moment[column], moment[pivot] = moment[pivot], moment[column]
        for row in range(column + 1, size):
            factor = gram[row][column] / gram[column][column]
            for j in range(column, size):
                gram[row][j] -= factor * gram[column][j]
            moment[row] -= factor * moment[column]
    coefficients = [0.0] * size
    for row in reversed(range(size)):
        total = moment[row] - sum(gram[row][j] * coefficients[j] for j in range(row + 1, size))
        coefficients[row] = total / gram[row][row]
    return coefficients


def main(argv):
    if len(argv) != 2:
        print("usage: task.sh SHARD  (e.g. shards/part-000.csv)", file=sys.stderr)
        return 2
    shard = argv[1]
    output_dir = os.environ["CFLOW_OUTPUT_DIR"]
    text = read_shard(os.environ["CFLOW_BUCKET"], shard)
    rows = [([float(r["x1"]), float(r["x2"]), float(r["x3"])], float(r["y"])) for r in csv.DictReader(io.StringIO(text))]
    coefficients = fit_least_squares(rows)
    predictions = [coefficients[0] + sum(c * x for c, x in zip(coefficients[1:], features)) for features, _ in rows]
    rmse = math.sqrt(sum((p - y) ** 2 for p, (_, y) in zip(predictions, rows)) / len(rows))
    with open(os.path.join(output_dir, "predictions.csv"), "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["shard", "row", "y", "prediction"])
        for index, (prediction, (_, y)) in enumerate(zip(predictions, rows)):
            writer.writerow([shard, index, f"{y:.6f}", f"{prediction:.6f}"])
    with open(os.path.join(output_dir, "metrics.csv"), "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["shard", "rows", "rmse", "b0", "b1", "b2", "b3"])
        writer.writerow([shard, len(rows), f"{rmse:.6f}", *(f"{c:.6f}" for c in coefficients)])
    print(f"{shard}: {len(rows)} rows, rmse {rmse:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
