"""Reading and writing the project's files: manifests, images, prediction sources, atomic writes."""
