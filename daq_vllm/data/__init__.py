"""Text data a run needs, shipped inside the package (WikiText-2) or, optionally, from the Hub.

A leaf: it imports only `daq_vllm.errors` and the standard library, so any room may import it.
"""
