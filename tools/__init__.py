"""Tools that use what runs leave: the homework's grids and tables (report), exports (export), speed (bench)."""
