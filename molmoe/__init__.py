"""molmoe: a readable PyTorch reference and a Triton fast path for the Molmo VLMs."""
