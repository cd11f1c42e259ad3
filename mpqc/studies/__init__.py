"""The scaling-law studies built on the compiler: sweeps, fitted laws, reports, prediction.

    mpqc.studies.sweep     run a grid of searches over models, ratios, formats and block sizes
    mpqc.studies.family    train the model family the sweeps run on (resumable; its CPU budget)
    mpqc.studies.laws      the fits (Law 1, Law 2) and Q_r,max read off a ratio curve
    mpqc.studies.report    laws.json, figures and a Markdown report from a sweep's results
    mpqc.studies.predict   predict a plan's delta_ppl from cheap measurements (Xu et al. 2024)

Studies import the core (mpqc's formats ... evaluate) and mpqc.search; the core imports
no study. Submodules load on first use.
"""
