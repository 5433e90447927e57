"""The application: typed requests (model, explanation, case run) and the run of a case, used by every front end."""
