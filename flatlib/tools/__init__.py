"""Tooling around the notebooks: reproduce (every notebook through papermill), the script
runner, compare (two figure sets), the generated report and the power calculation."""
