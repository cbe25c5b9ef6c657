"""Reading, splitting and encoding data: labelled text, causal-LM packing, scheduled mixtures, augmentation."""
