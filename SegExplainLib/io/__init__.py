"""Files in and out: images and their geometry, figures, reports. Imports only the engine and models."""
