"""Framework backends, installed as `multires.backends`: one folder per framework, the same file
names in each, each registered through the entry-point group `multires.backends`."""
