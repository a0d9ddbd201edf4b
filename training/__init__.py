"""Offline trainers (PromptKD, MoPD): data, methods, evaluation, bundle export."""
