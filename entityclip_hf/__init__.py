"""EntityCLIP for the Hugging Face ecosystem."""
