"""Using a checkpoint: post-processing, evaluation and COCO metrics, the Predictor, predict,
export, evaluation pictures.
"""
