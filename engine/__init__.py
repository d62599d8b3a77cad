"""The masked-diffusion infill engine. Importing the package imports nothing else: `engine.api`
is its torch-free interface, `engine.engine.Engine` the in-process engine (torch)."""
