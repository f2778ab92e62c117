"""Ray jobs built on the featcache library (extract, stats, FeatSharp data).

Each job module opens with the command that runs it. The jobs arrive with their issues; until
then the library and its CLI (``featcache index | inspect | verify``) are the whole product.
"""
