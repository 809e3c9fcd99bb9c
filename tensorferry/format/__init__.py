"""The prepared-artifact format, shared by its writer (``tensorferry.prepare``) and the
daemon's loader: safetensors headers, the manifest and its validating decoder.
"""
