"""The DAQ quantizer: group quantization, model walking and checkpoint writing."""
