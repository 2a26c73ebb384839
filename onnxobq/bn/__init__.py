"""BatchNorm re-estimation after quantization: statistics (stats), graph surgery (graph), passes, and the stage."""
