"""Model service: scikit-learn regression with conformal intervals, served by FastAPI."""
