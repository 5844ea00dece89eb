"""Stage `renders`: training digits drawn the way users send them, as the service sees them."""

import numpy as np

from digitops.data import mnist
from pipelines.renders import render


def test_each_render_is_a_repeatable_service_input_from_either_path(mnist_dir):
    images, labels = mnist.load(mnist_dir, "train")
    paths = set()
    for i in range(16):
        pixels, canvas = render(images[i], int(labels[i]), seed=0, index=i)
        again, _ = render(images[i], int(labels[i]), seed=0, index=i)
        assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, again), "a render depends on its seed and index only"
        assert pixels.max() == 255, "preprocessing scales every digit's strokes to white"
        paths.add(canvas)
    assert paths == {True, False}
    other, _ = render(images[0], int(labels[0]), seed=1, index=0)
    assert not np.array_equal(other, render(images[0], int(labels[0]), seed=0, index=0)[0])
