"""Label Studio ML backend for Attention Branch Networks."""
