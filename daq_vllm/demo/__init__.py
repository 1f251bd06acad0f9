"""`make demo`: the whole product on the embedded SmolLM2-135M (`python -m daq_vllm.demo`)."""
