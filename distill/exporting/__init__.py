"""Exporting the student: consolidated ZeRO shards to save_pretrained (+ int8, ONNX), WiSE-FT."""
