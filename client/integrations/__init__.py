"""Framework integrations (optional extras); import the one you use:

* :mod:`largebatch.client.integrations.hf`: Hugging Face ``Trainer`` (``pip install largebatch[hf]``)
* :mod:`largebatch.client.integrations.lightning`: PyTorch Lightning (``pip install largebatch[lightning]``)

This package itself imports neither.
"""
