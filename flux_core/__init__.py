"""flux_core: the FLUX.1 transformer, autoencoder, conditioning and flow-matching sampler, free of ComfyUI."""
