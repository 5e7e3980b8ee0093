"""Server-rendered pages: the annotator's workbench, the review queue and the research dashboard."""
