" effc pipeline files
au BufRead,BufNewFile *.eff set filetype=eff
