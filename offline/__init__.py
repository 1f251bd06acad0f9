"""The DAQ quantizer: group quantization, model walking and checkpoint writing.

Math (tensors in, tensors out): `grid` (rounding onto the stored fp16 grid), `ranges` (RTN, absmax,
DCA initializers), `ldra` (range tuning against input statistics), `compensated` (GPTQ-style codes
on fixed grids), `moments` (input second moments). The run: `options` (QuantizeOptions, RECIPES),
`targets` (what is quantized), `model_source`, `calibration`, `runner` and `layer_calibration`
(activations layer by layer), `pipeline` (quantize_model), `report`, `resume`, `checkpoint_writer`.
"""
