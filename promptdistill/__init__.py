"""promptdistill: prompt-distilled CLIP classifiers, trained offline and served over REST."""
