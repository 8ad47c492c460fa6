"""Everything MLflow: the logger (``logger.py``), what each run records (``records.py``), finding the run a
checkpoint continues (``runs.py``), and the best model as a servable MLflow model (``pyfunc.py``, whose code
is ``serving.py``). Import the modules themselves: this package imports nothing, so that serving a model
does not import the trainer stack."""
