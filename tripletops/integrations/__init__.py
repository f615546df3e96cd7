"""One-line drop-ins for the libraries people train with. Each submodule imports its
library only when one of its classes is first used:

- :mod:`tripletops.integrations.sentence_transformers`: sentence-transformers'
  ``BatchHardTripletLoss``, ``BatchSemiHardTripletLoss``, ``BatchAllTripletLoss`` and
  ``BatchHardSoftMarginTripletLoss``.
- :mod:`tripletops.integrations.pml`: pytorch-metric-learning's ``BatchHardMiner``,
  ``TripletMarginLoss`` and ``AccuracyCalculator``.
"""
