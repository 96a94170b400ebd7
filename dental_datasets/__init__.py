"""The datasets dentfed is used and tested with: the demo-data generator, the folder importer and
one module per dataset (manifest builder, natural clinic split, default config, baselines)."""
