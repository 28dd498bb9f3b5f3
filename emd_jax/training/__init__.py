"""Pieces every training step shares: optimizers and schedules, EMA, the non-finite guard."""
