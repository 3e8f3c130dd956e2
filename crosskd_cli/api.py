"""The Python API: a checkpoint in, detections out (`crosskd_cli.inference.predictor`).

    from crosskd_cli.api import Predictor

    model = Predictor.load("runs/distill/shapes-gfl-r34-to-r18/best.safetensors")
    for found in model.predict(["street.jpg", "park.png"], score_thr=0.3):
        print(found.names, found.scores, found.boxes)

This path stays stable whatever the package's inside looks like.
"""

from crosskd_cli.inference.predictor import ImageLike, Prediction, Predictor, as_tensor

__all__ = ["ImageLike", "Prediction", "Predictor", "as_tensor"]
