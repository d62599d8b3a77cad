"""The bundled model's pipeline (`lacuna train`): corpus, tokenizer, objective, loop and release.
Nothing the server or the engine runs imports it."""
