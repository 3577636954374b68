"""The built-in GPU runtime's engine. `config` is torch-free (planning reads it); the rest imports torch."""
