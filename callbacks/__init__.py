"""Lightning callbacks for distillation (soft-target caching, clustering, teacher placement, dashboards)."""
