"""Models: building torchvision CNNs with a new head, the checkpoint format, and the metadata of
exported (ONNX, TorchScript) model files."""
