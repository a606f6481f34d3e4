"""latent_core"""
