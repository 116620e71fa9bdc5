"""One-dimensional k-means (Lloyd) with the linear initialisation of Deep Compression."""

from __future__ import annotations

import numpy as np


def linear_init(values: np.ndarray, k: int) -> np.ndarray:
    """K centroids evenly spaced between min and max (Han et al. 2016: keeps the few large
    weights, which density-based initialisations under-represent)."""
    return np.linspace(float(values.min()), float(values.max()), k)


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The index of the nearest centroid of each value (ties go to the lower index)."""
    order = np.argsort(centroids, kind="stable")
    sorted_c = centroids[order]
    midpoints = (sorted_c[1:] + sorted_c[:-1]) / 2
    return order[np.searchsorted(midpoints, values, side="left")]


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations on ``values`` (1-D, float64) from :func:`linear_init`.

    Returns (centroids [k], assignments [n]). An empty cluster keeps its centroid. Stops when
    the assignments no longer change.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    centroids = linear_init(values, k)
    labels = assign(values, centroids)
    for _ in range(iterations):
        sums = np.bincount(labels, weights=values, minlength=k)
        counts = np.bincount(labels, minlength=k)
        filled = counts > 0
        centroids = centroids.copy()
        centroids[filled] = sums[filled] / counts[filled]
        new_labels = assign(values, centroids)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return centroids, labels
