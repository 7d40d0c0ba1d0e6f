"""One router per concern: health, models, segmentation."""
