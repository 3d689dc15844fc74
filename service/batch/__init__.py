"""``lensserve batch``: score folders of FITS files on a Dask cluster into one table."""
