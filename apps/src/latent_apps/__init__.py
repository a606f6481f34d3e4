"""latent_apps"""
