"""Local stand-ins for AWS (needs the `local` extra: moto[server])."""
