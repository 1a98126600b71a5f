"""The service's routes, one APIRouter module per concern; app/main.py includes them."""
