<?
/**
* Change this to the filename and path of the CSV file you wish to create
*/
	define("DATA_FILE","data.txt");

	$f=fopen(DATA_FILE,"a+");
	if ($f) {
		// use $_POST['key'] to get the mac address of the device
		// use $_POST['md5sum'] to verify the mac address
		if ($_POST['data']) {
			if ($_POST['md5sum']) {
				if (md5($_POST['data'])!=$_POST['md5sum']) {
					die("ERROR: MD5 sum mismatch");
				}
			}
			fwrite($f,$_POST['data']);
		}	
		fclose($f);
		//print("ERR001");
		print("OK");
  } else die("Error opening file");
?>