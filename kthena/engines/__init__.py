"""Inference engines as the router sees them: metric dialects, pod state, scraping."""
